"""Every guard broken once: each mutation below is applied to a scratch copy of the tree (the files
git tracks or would track), and the tests named for it are run there; they must fail. A mutation
that survives (its tests still pass) means a test no longer holds its guard: the run fails.

    .venv/bin/python scripts/guard_mutations.py            # all (CI runs this after the tests)
    .venv/bin/python scripts/guard_mutations.py whitelist  # those whose name contains a word

A general mutation tool over the whole code would take hours on 2 cores; this is the chosen list
of guards whose breaking must be noticed (docs/reliability.md and the caps and checks around it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.docker_stack import clean_clone  # noqa: E402  (the tree as a fresh clone holds it)


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    guard: str  # the exact text of the guard, found once in the file
    broken: str  # what it becomes
    tests: tuple[str, ...]


GPT_TRANSCRIBE = "tests/test_gpt_transcribe.py::"
BAD_LISTS = GPT_TRANSCRIBE + "test_bad_lists_are_refused_naming_the_field"

LIVE_TEXT = "tests/test_live_text.py::"
LIVE_WORDS = LIVE_TEXT + "test_words_arrive_while_the_person_is_still_talking"

HOURS = "tests/test_hours.py::"
DIARIZATION_WINDOWS = ("tests/test_diarization.py::"
                       "test_a_long_recording_is_diarized_in_windows_its_speakers_matched_across_them")

MUTATIONS = [
    # Hours of audio (bridge/decoding/stream.py): decoded samples on disk, freed with the request; a full disk a 507.
    Mutation("a request's decoded audio kept on disk, not in memory", "bridge/decoding/stream.py",
             'data = memoryview(chunk.astype("<i2", copy=False).tobytes())',
             'self.__dict__.setdefault("kept", []).append(chunk.copy())\n'
             '        data = memoryview(chunk.astype("<i2", copy=False).tobytes())',
             (HOURS + "test_an_hour_through_the_stack_holds_the_memory_of_minutes",)),
    Mutation("pieces read from the audio only a few ahead of the engine", "bridge/transcription.py",
             "ahead = asyncio.Semaphore(scheduler.connections + 1)", "ahead = asyncio.Semaphore(100000)",
             (HOURS + "test_an_hour_through_the_stack_holds_the_memory_of_minutes",)),
    Mutation("a full disk while decoding is the request's 507", "bridge/decoding/stream.py",
             "if exc.errno in (errno.ENOSPC, errno.EDQUOT):", "if False:",
             (HOURS + "test_a_full_disk_fails_the_request_with_507_not_the_bridge",)),
    Mutation("a request's decoded audio freed when it ends", "bridge/job.py",
             "self._held.callback(self.audio.close)", "pass",
             (HOURS + "test_the_decoded_audio_is_freed_however_the_request_ends",)),
    Mutation("a long recording's speakers found window by window", "bridge/diarization.py",
             "windows = plan_pieces(audio, self.window_seconds)", "windows = [(0, len(audio))]",
             (DIARIZATION_WINDOWS,)),
    Mutation("a window's speakers matched to those of the windows before", "bridge/diarization.py",
             "taken = best_pairs(", "taken = {} if True else best_pairs(",
             (DIARIZATION_WINDOWS,)),
    Mutation("each piece's first scored token starts a word", "bridge/transcript.py",
             'return token if token[:1].isspace() else " " + token', "return token",
             ("tests/test_parakeet_path.py::test_scores_are_the_engines_own_on_json_the_stream_and_segments",)),
    Mutation("requests at once reach the parakeet engine's batch", "adapters/managed_websocket.py",
             'f"--max-batch-size={self.max_batch_size if self.spec.batches else 1}",', '"--max-batch-size=1",',
             ("tests/test_parakeet_path.py::test_requests_at_once_reach_the_engines_batch",)),
    # Moonshine's weights folded once at install, not converted on every decoder step (bridge/models/ort_convert.py).
    Mutation("Moonshine's int8 weights folded at install", "bridge/models/ort_convert.py",
             "options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC",
             "options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL",
             ("tests/test_model_store.py::test_pypi_moonshine_is_installed_as_onnx_that_says_the_same",)),
    # Live text (bridge/live_text.py): agreement, its cost bounds, and what a closed segment sent.
    Mutation("live words go out once two passes agree", "bridge/live_text.py",
             "settled = agreed(self.previous, words)", "settled = words", (LIVE_WORDS,)),
    Mutation("words sent at a segment's close are not counted past the anchor", "bridge/live_text.py",
             "await self._send(turn, new, heard_at, past_anchor=False)",
             "await self._send(turn, new, heard_at, past_anchor=True)", (LIVE_WORDS,)),
    Mutation("with token times, live passes start after the last agreed word", "bridge/live_text.py",
             "cut = stable_cut(result, settled, MIN_SEGMENT_SECONDS) if token_times else None", "cut = None",
             ("tests/test_parakeet_path.py::test_live_text_cuts_a_turn_without_pauses_at_agreed_words_by_token_times",)),
    Mutation("live passes skipped while uploads hold the engine", "bridge/live_text.py",
             "elif busy or not self._engine_has_room():", "elif busy:",
             (LIVE_TEXT + "test_a_busy_engine_skips_passes_instead_of_queueing_them",)),
    Mutation("live text capped per bridge (REALTIME_LIVE_SESSIONS)", "bridge/realtime.py",
             "if self.state.live_sessions >= self.settings.realtime_live_sessions:", "if False:",
             (LIVE_TEXT + "test_live_text_is_capped_per_bridge_and_a_turn_never_committed_is_bounded",)),
    # gpt-transcribe's lists (bridge/api_types.py): each check of keywords[] and languages[].
    Mutation("keywords holding <, >, CR or LF refused", "bridge/api_types.py",
             '"holds <, >, CR or LF" if any(ch in keyword for ch in KEYWORD_FORBIDDEN) else ""',
             '"holds <, >, CR or LF" if False else ""',
             (BAD_LISTS + "[angle]", BAD_LISTS + "[newline]")),
    Mutation("empty keywords refused", "bridge/api_types.py", '"is empty" if not keyword.strip() else',
             '"is empty" if False else', (BAD_LISTS + "[empty]",)),
    Mutation("long keywords refused", "bridge/api_types.py",
             'if len(keyword) > MAX_KEYWORD_CHARS else', 'if False else',
             (BAD_LISTS + "[long]",)),
    Mutation("at most MAX_KEYWORDS keywords", "bridge/api_types.py", "if len(values) > MAX_KEYWORDS:", "if False:",
             (BAD_LISTS + "[many]",)),
    Mutation("languages[] are ISO-639-1 codes", "bridge/api_types.py", "if not is_iso_639_1(code):", "if False:",
             (BAD_LISTS + "[not-iso]", BAD_LISTS + "[a-name]")),
    Mutation("hinted languages the model speaks none of refused", "bridge/request_checks.py",
             "if not languages or set(languages) & set(spec.languages):", "if True:",
             (GPT_TRANSCRIBE + "test_languages_the_model_does_not_speak_name_the_model_that_does",)),
    Mutation("keywords reach sherpa-onnx's hotword syntax without its commands", "adapters/keywords.py",
             'phrases = (" ".join(_NOT_WORD.sub(" ", k).split()) for k in keywords)',
             "phrases = (k for k in keywords)",
             (GPT_TRANSCRIBE + "test_keywords_with_command_characters_do_not_harm_the_engine",)),
    Mutation("word times stay inside their piece (a transducer's last duration runs past it)", "bridge/transcript.py",
             "words = words_from_tokens(result, start, end) if token_timestamps else []",
             "words = words_from_tokens(result, start) if token_timestamps else []",
             ("tests/test_parakeet_path.py::test_words_and_segments_stay_inside_the_audio",)),
    Mutation("demuxer whitelist", "bridge/decoding/ffmpeg.py",
             '"au,voc,ac3,eac3,dts,truehd,mp2,loas,latm,3gp"', '"au,voc,ac3,eac3,dts,truehd,mp2,loas,latm,3gp,nut"',
             ("tests/test_bad_inputs.py::test_a_valid_recording_in_a_container_off_the_whitelist_is_refused",)),
    Mutation("proxy cap on chunked bodies", "auth_proxy/forwarding.py", "if size > cap:", "if size > cap * 100:",
             ("tests/test_proxy.py::test_oversized_bodies_are_refused_before_forwarding",)),
    # The decoders' own caps (the worker's sample count, ffmpeg's -t) sit behind this one, which holds
    # the memory: breaking either alone changes nothing a test can see, so the bridge's cap is the guard.
    Mutation("decoded audio capped at SHERPA_MAX_UTTERANCE (decompression bomb)", "bridge/decoding/stream.py",
             "self.limit = cap_samples(max_seconds)", "self.limit = cap_samples(max_seconds) * 7",
             ("tests/test_bad_inputs.py::test_audio_longer_than_the_limit_is_refused_without_decoding_it_all",)),
    Mutation("key guessing refused", "auth_proxy/auth.py",
             'if not await state.limiter.test(item, "auth-failures", address):', "if False:",
             ("tests/test_proxy_attacks.py::test_key_guessing_is_refused_after_a_few_tries",)),
    Mutation("model switch for admin keys only", "auth_proxy/routes.py",
             'if path == "/v1/models/switch" and not key.admin:', 'if path == "/v1/models/switch" and False:',
             ("tests/test_proxy_attacks.py::test_a_model_switch_needs_an_admin_key",)),
    Mutation("other keys' usage for admins only", "auth_proxy/routes.py",
             "elif key is not None and key not in (caller.name, caller.id):", "elif False:",
             ("tests/test_proxy_attacks.py::test_usage_of_other_keys_is_for_admins_only",)),
    Mutation("paths outside the API never forwarded", "auth_proxy/routes.py",
             'if not path.startswith(FORWARDED_PREFIXES) or ".." in segments or "." in segments or "" in segments[1:]:',
             "if False:",
             ("tests/test_proxy_attacks.py::test_paths_and_methods_outside_the_api_are_never_forwarded",)),
    Mutation("stalled upload cut off", "auth_proxy/forwarded_request.py",
             "cap, settings.body_read_timeout,", "cap, settings.body_read_timeout * 30,",
             ("tests/test_proxy_attacks.py::test_a_stalled_upload_is_cut_off",)),
    Mutation("a request cut off by the shutdown answered 503 in OpenAI's shape", "common/serving.py",
             "        except asyncio.CancelledError:\n            if answer.started:",
             "        except ZeroDivisionError:\n            if answer.started:",
             ("tests/test_serving.py",)),
    Mutation("slow request heads cut off (slowloris)", "common/serving.py",
             "if self.head_timeout > 0 and not self.transport.is_closing():", "if False:",
             ("tests/test_proxy_attacks.py::test_slow_request_heads_are_cut_off",)),
    Mutation("requests in flight capped by the proxy (503 overloaded)", "auth_proxy/admission.py",
             "if self.state.in_flight >= self.state.settings.max_in_flight:", "if False:",
             ("tests/test_bounds.py::test_64_uploads_at_once_are_bounded_and_the_caps_answer_503",)),
    Mutation("quick one-word answers start a turn", "bridge/realtime.py",
             "TURN_MIN_SPEECH_SECONDS = 0.1", "TURN_MIN_SPEECH_SECONDS = 0.25",
             ("tests/test_realtime.py::test_quick_one_word_answers_are_turns_not_dropped",)),
    Mutation("one engine connection kept for newcomers", "bridge/scheduler.py",
             "self._per_request = max(1, workers - 1)", "self._per_request = max(1, workers)",
             ("tests/test_long_audio.py::test_stream_delivers_early_and_a_disconnect_cancels_the_rest",)),
    Mutation("one VAD pass: the guard reads the cut's speech", "bridge/guard.py",
             "speech = known if known is not None else await", "speech = await",
             ("tests/test_one_vad_pass.py::test_the_guard_reuses_the_cuts_scan",)),
    Mutation("the guard keeps the halves of a piece the model dropped (real babble)", "bridge/guard.py",
             "if joined_verdict < verdict:", "if False:",
             ("tests/test_accuracy.py::test_the_guard_wins_back_words_the_model_drops_on_real_babble",)),
    Mutation("one VAD pass: cues read the cut's speech", "bridge/transcription.py",
             "        if not self.complete:\n            self.rescans += 1",
             "        if True:\n            self.rescans += 1",
             ("tests/test_one_vad_pass.py::test_cues_and_scores_reuse_the_cuts_scan",)),
    Mutation("the scan holds speech down to 0.15 below the threshold (sherpa-onnx's hysteresis)", "bridge/silero.py",
             "max(f32(threshold - f32(0.15)), f32(0.01))", "max(f32(threshold - f32(0.0)), f32(0.01))",
             ("tests/test_vad.py::test_the_scan_finds_sherpa_onnx_segments_on_real_speech",)),
    Mutation("a cut sought in a long window is read 30 s at a time", "bridge/cutting.py",
             "RMS_BLOCK = 300 * FRAME", "RMS_BLOCK = 10**12",
             ("tests/test_long_audio.py::test_cutting_a_long_window_reads_it_a_little_at_a_time",)),
    Mutation("a long scan lets go of each region once its segments are handed on", "bridge/vad.py",
             "                regions.pop(0)\n",
             '                self.__dict__.setdefault("kept", []).append(regions.pop(0))\n',
             ("tests/test_vad.py::test_a_long_scan_holds_no_more_than_a_short_one",)),
    Mutation("each region of a batched scan keeps its own model state", "bridge/silero.py",
             "[state[:, i:i + 1].copy() for i in range(len(states))]",
             "[state[:, :1].copy() for i in range(len(states))]",
             ("tests/test_vad.py::test_regions_in_one_model_run_find_what_each_finds_alone",)),
    Mutation("the scan hands on each segment once found, not when its region ends", "bridge/vad.py",
             "                while region.found:\n                    yield region.found.popleft()\n"
             "                if not region.finished:\n                    break\n",
             "                if not region.finished:\n                    break\n"
             "                while region.found:\n                    yield region.found.popleft()\n",
             ("tests/test_long_audio.py::test_pieces_go_out_while_the_vad_is_still_scanning",)),
    Mutation("a request that goes away stops its scan", "bridge/vad.py",
             "if (not regions and not coming) or (stop is not None and stop.is_set()):",
             "if not regions and not coming:",
             ("tests/test_long_audio.py::test_pieces_go_out_while_the_vad_is_still_scanning",)),
    Mutation("a piece reads the speech that began before it (bisection from the longest range back)",
             "bridge/transcription.py",
             "lo = bisect.bisect_left(self._ordered, (start - self._longest,))",
             "lo = bisect.bisect_left(self._ordered, (start,))",
             ("tests/test_one_vad_pass.py::test_each_piece_reads_the_speech_near_it_as_the_whole_list_gives_it",)),
    Mutation("the speech found out of order is put in order before it is bisected", "bridge/transcription.py",
             "                self._ordered.sort()\n", "",
             ("tests/test_one_vad_pass.py::test_each_piece_reads_the_speech_near_it_as_the_whole_list_gives_it",)),
    Mutation("the proxy lets an idle bridge connection go before the bridge closes it", "auth_proxy/app.py",
             "                            keepalive_expiry=KEEP_ALIVE_SECONDS / 2),",
             "                            ),",
             ("tests/test_serving.py::test_the_proxy_lets_an_idle_connection_to_a_bridge_go_before_the_bridge_closes_it",)),
    Mutation("a round of the scan's windows is one model run", "bridge/silero.py",
             "self.rounds = self._rounds_session(path, opts)", "self.rounds = None",
             ("tests/test_vad.py::test_a_round_of_windows_is_one_model_run",)),
    Mutation("the rebuilt Silero graph is checked against the exported model", "bridge/silero.py",
             "if np.abs(got.T - want).max() > 1e-4 or np.abs(got_state - want_state).max() > 1e-3:", "if False:",
             ("tests/test_vad.py::test_a_rebuilt_graph_that_differs_from_the_model_is_not_used",)),
    Mutation("live turns cut with the 16 kHz scan (G.711 keeps its words)", "bridge/realtime.py",
             "cut_pieces(audio, engine.spec.max_piece_seconds, state.live_detector,",
             "cut_pieces(audio, engine.spec.max_piece_seconds, state.detector,",
             ("tests/test_openai_fields.py::test_g711_live_sessions_hear_what_pcm16_hears",)),
    Mutation("onnxruntime telemetry off", "bridge/__init__.py",
             'os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")', 'os.environ.get("ORT_DISABLE_TELEMETRY")',
             ("tests/test_operations.py::test_the_bridge_turns_off_onnxruntime_telemetry",)),
    Mutation("regions scanned on one pass's window grid (cuts on its grid, in its pauses)", "bridge/vad.py",
             "start = max(0, self.placed * size - lead) // SHIFT * SHIFT", "start = max(0, self.placed * size - lead)",
             ("tests/test_first_text.py::test_regions_scanned_side_by_side_cut_like_one_scan",)),
    Mutation("regions laid out by the file alone, not by how far the decoder is ahead", "bridge/vad.py",
             "regions.append(_Region(stream.window(start, self.placed * size), start,",
             "regions.append(_Region(stream.window(start, max(self.placed * size, stream.available)), start,",
             ("tests/test_vad.py::test_the_cuts_do_not_depend_on_how_fast_the_audio_is_decoded",)),
    Mutation("include[]=logprobs refused where the model has none", "bridge/request_checks.py",
             "if wanted and not spec.token_logprobs:", "if False:",
             ("tests/test_openai_fields.py::test_logprobs_are_refused_where_the_model_has_none",)),
    Mutation("a translation never answered by a model that cannot translate", "bridge/request_checks.py",
             "if model_id in state.catalog and state.catalog.get(model_id).translates:", "if True:",
             ("tests/test_openai_fields.py::test_translations",)),
    Mutation("known speakers' references 2-10 s", "bridge/speakers.py",
             "if not low <= len(out[name]) / SAMPLE_RATE <= high:", "if False:",
             ("tests/test_diarization.py::test_bad_diarize_requests_name_their_field",)),
    # docs/reliability.md's faults: what must hold when a part fails.
    Mutation("a request the usage store cannot record is refused, never served unmetered", "auth_proxy/metering.py",
             "        if not await asyncio.shield(step):\n            raise usage_unavailable()",
             "        if not await asyncio.shield(step):\n            return",
             ("tests/test_faults.py::test_usage_disk_full_under_load",)),
    Mutation("nothing answered before its usage record is on disk", "auth_proxy/forwarded_request.py",
             "await self.metered.durable()  # the fsync ran", "pass  # the fsync ran",
             ("tests/test_proxy.py::test_nothing_is_answered_before_its_usage_record_is_on_disk",)),
    Mutation("the usage store's WAL synced (synchronous=NORMAL leaves it to us)", "auth_proxy/usage_store.py",
             "        if self.postgres or self._wal is None:\n            return\n        with self._lock:",
             "        if True:\n            return\n        with self._lock:",
             ("tests/test_proxy.py::test_nothing_is_answered_before_its_usage_record_is_on_disk",)),
    Mutation("a request cut off by the proxy's stop gets its usage outcome written before the store closes",
             "auth_proxy/app.py", "while state.in_flight and time.monotonic() < deadline:",
             "while False and time.monotonic() < deadline:",
             ("tests/test_serving.py::test_a_forwarded_request_cut_off_by_the_proxy_stop_gets_a_503_and_its_usage_outcome",)),
    Mutation("limits counted in memory while Redis is down", "auth_proxy/limiter.py",
             "except Exception as exc:  # noqa: BLE001 - any storage failure: count locally meanwhile",
             "except ZeroDivisionError as exc:",
             ("tests/test_routing.py::test_redis_outage_limits_each_proxy_on_its_own_then_shares_again",)),
    Mutation("the key file reloaded when it changes", "auth_proxy/keys.py",
             "if not force and stamp == self._stamp:", "if not force:",
             ("tests/test_proxy.py::test_key_file_hot_reload_malformed_and_revoke",)),
    Mutation("a killed engine restarted", "adapters/managed_websocket.py",
             "if len(self._crashes) > self.max_restarts:", "if True:",
             ("tests/test_supervision.py::test_kill_9_of_the_engine_is_survived",)),
]


def run(mutation: Mutation, scratch: Path) -> tuple[bool, str, float]:
    """Apply ``mutation`` in ``scratch`` and run its tests: (caught, pytest's last lines, seconds)."""
    path = scratch / mutation.file
    text = path.read_text()
    if text.count(mutation.guard) != 1:
        raise SystemExit(f"{mutation.name}: the guard {mutation.guard!r} is not found exactly once in "
                         f"{mutation.file}: update this list with the code")
    path.write_text(text.replace(mutation.guard, mutation.broken))
    started = time.monotonic()
    # cwd first on sys.path: the scratch copy's packages, not the installed ones, are imported (and
    # the processes the tests start run from the scratch copy too).
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider",
                           "-o", "addopts=", *mutation.tests], cwd=scratch, capture_output=True, text=True,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "COLUMNS": "300"})
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
    # 1: tests ran and failed. 0 would be a survivor; anything else (a collection error) proves nothing.
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{mutation.name}: pytest could not run the tests (exit {proc.returncode}):\n"
                         f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    # A test must fail on what it checks: an assertion, pytest.fail, or the client's own timeout where the
    # guard cuts something off. An error in a fixture, or a test that cannot find its files or tools,
    # proves nothing. pytest -rfE lists them as "FAILED test - AssertionError: ..." and "ERROR test - ...".
    failures = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    unproven = [line for line in failures if line.startswith("ERROR ") or line.partition(" - ")[2].startswith(
        ("FileNotFoundError", "ModuleNotFoundError", "ImportError", "subprocess.CalledProcessError"))]
    if proc.returncode == 1 and (unproven or not failures):
        raise SystemExit(f"{mutation.name}: the tests broke on something other than what they check:\n"
                         + "\n".join(unproven or [proc.stdout[-3000:]]))
    if failures:  # what broke, as proof in the log
        tail = failures[0][:240]
    return proc.returncode == 1, tail, time.monotonic() - started


def main(words: list[str]) -> int:
    chosen = [m for m in MUTATIONS if not words or any(w in m.name for w in words)]
    survived = []
    with tempfile.TemporaryDirectory(prefix="guard-mutations-") as tmp:
        pristine = clean_clone(Path(tmp) / "pristine")
        # The tests read ../shared (LibriSpeech, the diarization stand-ins) beside the checkout.
        if (ROOT.parent / "shared").is_dir():
            (Path(tmp) / "shared").symlink_to(ROOT.parent / "shared")
        check = subprocess.run([sys.executable, "-c", "import bridge; print(bridge.__file__)"], cwd=pristine,
                               capture_output=True, text=True)
        assert check.stdout.startswith(str(pristine)), f"the scratch copy is not what gets imported: {check}"
        for i, mutation in enumerate(chosen):
            scratch = Path(tmp) / f"m{i}"
            subprocess.run(["cp", "-a", str(pristine), str(scratch)], check=True)
            caught, tail, seconds = run(mutation, scratch)
            print(f"{'caught  ' if caught else 'SURVIVED'} {mutation.name} ({mutation.file}; {seconds:.0f} s)",
                  flush=True)
            print("    " + tail.replace("\n", "\n    "), flush=True)
            if not caught:
                survived.append(mutation)
            subprocess.run(["rm", "-rf", str(scratch)], check=True)
    if survived:
        print(f"{len(survived)} guard mutation(s) survived: their tests no longer hold them", file=sys.stderr)
        return 1
    print(f"all {len(chosen)} guard mutations were caught")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
