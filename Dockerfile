# The build-machine image: the same install as the README's `make demo`, step for step.
FROM python:3.11-slim-bookworm

RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake make git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/edgecds
COPY . .

# `make install`: a virtual environment with edgecds[build,test], llama.cpp compiled for the CPU.
RUN make install

ENV PATH=/opt/edgecds/.venv/bin:$PATH
# Pull the default model at build time, so the image runs with no network.
RUN edgecds models pull default

CMD ["make", "demo"]
