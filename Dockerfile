FROM python:3.11-slim
WORKDIR /app
# EXTRAS=local builds a GPU worker's image (torch's CUDA build, diffusers):
# docker-compose.yml. Either way the image holds exactly a lock file's versions
# (requirements/runtime.txt or requirements/gpu.txt, written by scripts/lock).
ARG EXTRAS=""
COPY requirements ./requirements
RUN pip install --no-cache-dir --require-hashes --no-deps \
      -r "requirements/$([ "$EXTRAS" = local ] && echo gpu || echo runtime).txt"
COPY pyproject.toml README.md ./
COPY api ./api
COPY worker ./worker
COPY shared ./shared
COPY cli ./cli
COPY migrations ./migrations
RUN pip install --no-cache-dir --no-deps --no-build-isolation . && useradd --create-home imagegen
USER imagegen
EXPOSE 8000
CMD ["imagegen", "api", "--host", "0.0.0.0"]
