# pgfleet: a slim image running `pgfleet run` as a non-root user.
# No Docker engine runs on the development machines: this file is reviewed by reading.
FROM python:3.11-slim AS build
# gcc builds proxy/router/_hash.c (the partition hash in C); the image itself needs no compiler.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proxy ./proxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim

RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin pgfleet
WORKDIR /opt/pgfleet
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels && mkdir -p /etc/pgfleet

USER pgfleet
EXPOSE 6432 9930
# /health/live arrives with the HTTP endpoints; until then a TCP check on the listener.
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD python -c "import socket; socket.create_connection(('127.0.0.1', 6432), 2).close()"
ENTRYPOINT ["pgfleet"]
CMD ["run", "--config", "/etc/pgfleet/pgfleet.yaml"]
