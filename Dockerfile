# Two images, one file (neither can be built on the project's own machines: no container engine runs there).
#
#   docker build -t edgecds-build .                  the build machine: `make demo`'s install, step for step
#   docker build --target device -t edgecds-device .  a clinic device: serves a bundle; no torch, no compiler
#
# Both compile llama.cpp for a portable CPU target (LLAMA_CPU=portable: AVX2, FMA, F16C; no AVX-512,
# no AMX), not for the CPU of the machine that builds the image: a -march=native build dies with
# SIGILL on an older CPU, and one made on an Intel Xeon with AMX carries llama.cpp's AMX path, which
# crashes (llama.cpp issue 20824; edgecds's probe would turn it off, at the cost of repacking).

# --- wheels: llama-cpp-python compiled once, for both images -------------------------------------
FROM python:3.11-slim-bookworm AS wheels
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake make git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN CMAKE_ARGS="$(make -s llama-cmake-args LLAMA_CPU=portable)" pip wheel --no-deps -c constraints.txt -w /wheels \
        llama-cpp-python . \
    && make -s llama-cmake-args LLAMA_CPU=portable > /wheels/LLAMA_CMAKE_ARGS

# --- device: the runtime side only (pyproject's base dependencies) -------------------------------
FROM python:3.11-slim-bookworm AS device
COPY --from=wheels /wheels /wheels
COPY constraints.txt /tmp/constraints.txt
RUN pip install --no-cache-dir -c /tmp/constraints.txt /wheels/*.whl \
    && useradd --create-home edgecds
USER edgecds
# Mount the bundle at /bundle and pass the token in a file (never on the command line):
#   docker run -p 127.0.0.1:8080:8080 -v $PWD/edgecds-out/bundle:/bundle:ro \
#       -v $PWD/token:/run/token:ro edgecds-device
# Inside the container the server must listen on all of the container's addresses for -p to reach
# it; the -p above still publishes it on the host's loopback only.
EXPOSE 8080
ENTRYPOINT ["edgecds"]
CMD ["serve", "/bundle", "--host", "0.0.0.0", "--port", "8080", "--token-file", "/run/token"]

# --- build machine (the default target): `make install` with the same portable llama.cpp ----------
FROM python:3.11-slim-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake make git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/edgecds
COPY . .
COPY --from=wheels /wheels /wheels
# pip takes llama-cpp-python from the portable wheel instead of compiling it again
RUN PIP_FIND_LINKS=/wheels make install LLAMA_CPU=portable
ENV PATH=/opt/edgecds/.venv/bin:$PATH
# Pull the default model at build time, so the image runs with no network.
RUN edgecds models pull default
CMD ["make", "demo"]
