# DiffewS Label Studio backend. One image, two commands:
#   web:    gunicorn (default CMD) - no torch import, no model
#   worker: python -m backend worker - loads the model once, runs jobs on the GPU
# torch==2.13.0 from PyPI ships its CUDA runtime; run GPU workers with the NVIDIA container toolkit.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MODEL_DIR=/data \
    HF_HOME=/data/hf-cache

WORKDIR /app
COPY requirements.txt .
RUN pip install -r requirements.txt && pip check

COPY model/ model/
COPY backend/ backend/
COPY _wsgi.py .

RUN useradd --create-home --uid 1000 app && mkdir -p /data && chown app /data
USER app
VOLUME /data
EXPOSE 9090

HEALTHCHECK --interval=30s --timeout=3s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/health', timeout=2)"

CMD ["gunicorn", "--workers", "2", "--threads", "48", "--bind", "0.0.0.0:9090", "--timeout", "120", "--no-control-socket", "_wsgi:app"]
