# The GPU serving variant of the API image: the same API (no torch), with ONNX Runtime's CUDA build, so fp16
# and fp32 students are served on the GPU (compose service api-gpu, profile gpu-serving, LDD_PROVIDERS=cuda,cpu).
# The CUDA 12 runtime and cuDNN 9 libraries come from the base image (onnxruntime-gpu >= 1.19 on PyPI is built
# for CUDA 12 + cuDNN 9); the NVIDIA container runtime provides the driver.
# Build from the repository root: docker build -f docker/api-gpu.Dockerfile .
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY pyproject.toml README.md ./
COPY api ./api
COPY core ./core
COPY worker ./worker
COPY distill ./distill
COPY deploy ./deploy
# serve: FastAPI, uvicorn, ONNX Runtime; queue: Celery/Redis client and the store's drivers. serve pulls the CPU
# onnxruntime; onnxruntime-gpu installs the same `onnxruntime` module, so it replaces it and is the one imported.
RUN pip install --upgrade pip \
    && pip install ".[serve,queue]" \
    && pip uninstall -y onnxruntime \
    && pip install --force-reinstall --no-deps "onnxruntime-gpu>=1.19" \
    && python -c "import api.app, sys; assert 'torch' not in sys.modules, 'the API image must not pull torch'" \
    && python -c "import onnxruntime as ort; assert 'CUDAExecutionProvider' in ort.get_available_providers(), ort.get_available_providers()"

ENV LDD_DATA_DIR=/data LDD_PROVIDERS=cuda,cpu
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
CMD ["uvicorn", "--factory", "api.app:create_app", "--host", "0.0.0.0", "--port", "8000", "--no-access-log"]
