# The API image: FastAPI + ONNX Runtime on the CPU, no torch (small, starts fast).
# Build from the repository root: docker build -f docker/api.Dockerfile .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY api ./api
COPY core ./core
COPY worker ./worker
COPY distill ./distill
COPY deploy ./deploy
# serve: FastAPI, uvicorn, ONNX Runtime; queue: Celery/Redis client and the store's drivers.
RUN pip install ".[serve,queue]" \
    && python -c "import api.app, sys; assert 'torch' not in sys.modules, 'the API image must not pull torch'"

ENV LDD_DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
CMD ["uvicorn", "--factory", "api.app:create_app", "--host", "0.0.0.0", "--port", "8000", "--no-access-log"]
