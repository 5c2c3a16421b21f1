FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY api ./api
COPY worker ./worker
COPY shared ./shared
COPY cli ./cli
COPY migrations ./migrations
RUN pip install --no-cache-dir . && useradd --create-home imagegen
USER imagegen
EXPOSE 8000
CMD ["imagegen", "api", "--host", "0.0.0.0"]
