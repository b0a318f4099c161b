# Test stand-in for nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04 (Docker Hub is unreachable where the
# tests run): a Debian bookworm with apt, no CUDA. Dockerfile.bridge builds on it up to the engine's
# download from GitHub, which cannot be reached here either. The CA bundle lets pip and curl through
# the machine's TLS proxy.
FROM mvp-standin/debian:bookworm
LABEL org.mvp-stt.standin="nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04"
COPY ca.crt /usr/local/share/standin-ca.crt
ENV PIP_CERT=/usr/local/share/standin-ca.crt \
    CURL_CA_BUNDLE=/usr/local/share/standin-ca.crt
