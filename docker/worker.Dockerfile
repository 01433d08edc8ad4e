# The itsd worker image: ONNX Runtime on CUDA (onnxruntime-gpu), the tokenizer, Celery. No torch.
# Build: docker compose build worker   (or: docker build -f docker/worker.Dockerfile -t itsd-worker .)
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 VIRTUAL_ENV=/opt/itsd
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv "$VIRTUAL_ENV"
ENV PATH="$VIRTUAL_ENV/bin:$PATH"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY core core
COPY worker worker
COPY producer producer
COPY export export
COPY training training
# The `gpu` extra: onnxruntime-gpu (CUDA and TensorRT execution providers), tokenizers, celery[redis],
# fsspec, prometheus-client; `s3`: s3fs, for inputs and outputs on s3:// (add gcsfs for gs://).
RUN pip install ".[gpu,s3]" && pip check && ! pip show torch >/dev/null 2>&1

RUN useradd --create-home --uid 1000 itsd && mkdir -p /cache && chown itsd /cache
USER itsd
ENV ITSD_CACHE_DIR=/cache
ENTRYPOINT ["itsd"]
CMD ["worker", "--help"]
