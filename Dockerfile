FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY api ./api
COPY worker ./worker
COPY shared ./shared
COPY cli ./cli
COPY migrations ./migrations
# EXTRAS=local builds a GPU worker's image (torch, diffusers): docker-compose.yml
ARG EXTRAS=""
RUN pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}" && useradd --create-home imagegen
USER imagegen
EXPOSE 8000
CMD ["imagegen", "api", "--host", "0.0.0.0"]
