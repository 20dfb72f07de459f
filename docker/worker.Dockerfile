# The GPU worker image: CUDA PyTorch (PyPI's Linux wheels are CUDA builds; the NVIDIA container
# runtime provides the driver), training, ONNX export, Celery. One job at a time (-c 1 inside).
# Build from the repository root: docker build -f docker/worker.Dockerfile .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY api ./api
COPY core ./core
COPY worker ./worker
COPY distill ./distill
COPY deploy ./deploy
# train pulls onnxruntime (CPU) and gpu pulls onnxruntime-gpu; both install the same `onnxruntime`
# module, so the GPU build is reinstalled last to be the one that is imported.
RUN pip install ".[train,queue,gpu]" \
    && pip uninstall -y onnxruntime \
    && pip install --force-reinstall --no-deps "onnxruntime-gpu>=1.18"

ENV LDD_DATA_DIR=/data
VOLUME ["/data"]
HEALTHCHECK --interval=30s --timeout=10s --retries=3 \
    CMD python -c "import sys; from core.queue import broker_ok; sys.exit(0 if broker_ok() else 1)"
# python -m worker: a Celery worker on queue gpu with --concurrency 1 --prefetch-multiplier 1.
CMD ["python", "-m", "worker"]
