# Test stand-in for python:3.11-slim (Docker Hub is unreachable where the tests run): Debian
# bookworm (the real image's base) with Python 3.11, `python` and `pip` on PATH as root, like the
# real one. The CA bundle of the machine running the tests lets pip through its TLS proxy.
FROM mvp-standin/debian:bookworm
LABEL org.mvp-stt.standin="python:3.11-slim"
COPY ca.crt /usr/local/share/standin-ca.crt
ENV PIP_CERT=/usr/local/share/standin-ca.crt
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /usr/local/python
ENV PATH=/usr/local/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
CMD ["python3"]
