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
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
 && groupadd --gid 1000 imagegen && useradd --create-home --uid 1000 --gid 1000 imagegen
# By number: Kubernetes' runAsNonRoot can check it, and deploy/ runs as the same.
# 1000, what useradd gave before: compose's gpu-worker writes the HF cache into a
# host folder, most often owned by the host's first user, 1000 too.
USER 1000:1000
EXPOSE 8000
CMD ["imagegen", "api", "--host", "0.0.0.0"]
