# The itsd worker image, no torch. Two flavours from this one file:
#   GPU (the defaults): CUDA + cuDNN runtime, onnxruntime-gpu (CUDA and TensorRT providers)
#     docker build -f docker/worker.Dockerfile -t itsd-worker .
#   CPU: ONNX Runtime and OpenVINO on a slim Python base, and Flower (compose.cpu.yaml runs it from this image)
#     docker build -f docker/worker.Dockerfile -t itsd-worker-cpu --build-arg BASE=python:3.11-slim-bookworm \
#       --build-arg EXTRAS=worker,openvino,s3 --build-arg PACKAGES=flower .
# Without a registry or PyPI (scripts/images, docs/deploy.md): BASE=a local image (e.g. from Debian's packages
# by mmdebstrap), the wheels in ./wheelhouse, NO_INDEX=1, and `docker build --pull=false --network none`.
ARG BASE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

FROM ${BASE} AS python
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/itsd LANG=C.UTF-8
# Python and venv from the base when it has them (python:*, a Debian base), else from its packages (CUDA's).
RUN python3 -c "import ensurepip, venv" 2>/dev/null \
 || (apt-get update && apt-get install -y --no-install-recommends python3 python3-venv && rm -rf /var/lib/apt/lists/*)

FROM python AS build
LABEL itsd.stage=build
# gpu,s3: onnxruntime-gpu, tokenizers, celery[redis], fsspec, prometheus-client, s3fs (inputs and outputs
# on s3://; add gcsfs for gs://). worker,openvino,s3: the same on onnxruntime, with OpenVINO (and NNCF).
ARG EXTRAS=gpu,s3
ARG PACKAGES=""
ARG NO_INDEX=""
COPY wheelhouse /wheelhouse
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY core core
COPY worker worker
COPY producer producer
COPY export export
COPY training training
RUN python3 -m venv "$VIRTUAL_ENV" \
 && "$VIRTUAL_ENV/bin/pip" install --find-links /wheelhouse ${NO_INDEX:+--no-index} ".[$EXTRAS]" $PACKAGES \
 && "$VIRTUAL_ENV/bin/pip" check && ! "$VIRTUAL_ENV/bin/pip" show torch >/dev/null 2>&1

FROM python
COPY --from=build /opt/itsd /opt/itsd
ENV PATH="/opt/itsd/bin:$PATH" ITSD_CACHE_DIR=/cache
# uid 1000 (CUDA's Ubuntu base has its own user there: it gives way). /cache (TensorRT engines) is writable
# by any uid, so compose may run the worker as the host's user (outputs on a host volume are then theirs).
RUN if getent passwd 1000 >/dev/null; then userdel --remove "$(getent passwd 1000 | cut -d: -f1)" 2>/dev/null; fi; \
    useradd --create-home --uid 1000 itsd && install -d -m 1777 /cache
USER 1000
ENTRYPOINT ["itsd"]
CMD ["worker", "--help"]
