# One image for the API, the worker and the migrate job (docker-compose.yml picks the command).
# torch's Linux wheels bring their own CUDA libraries, so a slim Python base runs on a GPU host with
# the NVIDIA container toolkit; no CUDA base image is needed.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    COFT_DATA_DIR=/data \
    COFT_MODELS_DIR=/models

WORKDIR /srv/coft
RUN useradd --create-home --uid 1000 coft && mkdir -p /data /models && chown coft:coft /data /models

# Dependencies first (cached across code changes), pinned by constraints.txt like `make install`.
COPY pyproject.toml constraints.txt README.md ./
COPY coft ./coft
COPY app ./app
COPY worker ./worker
# Editable: alembic.ini and migrations/ stay next to the code, where app.cli finds them.
RUN pip install -c constraints.txt -e '.[service]'
COPY alembic.ini ./
COPY migrations ./migrations

USER coft
EXPOSE 8000
CMD ["uvicorn", "app.api.main:app_factory", "--factory", "--host", "0.0.0.0", "--port", "8000"]
