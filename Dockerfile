# One image for the API and the workers. CPU torch by default; for GPU workers build with e.g.
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 -t isl-refine .
FROM python:3.11-slim
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY imaging ./imaging
COPY segmentation ./segmentation
COPY registration ./registration
COPY isl ./isl
COPY jobstore ./jobstore
COPY worker ./worker
COPY service ./service
COPY models ./models
RUN pip install --no-cache-dir "$TORCH_SPEC" --index-url "$TORCH_INDEX" \
 && grep -v '^torch==' constraints.txt > /tmp/constraints.txt \
 && pip install --no-cache-dir -c /tmp/constraints.txt . \
 && useradd --create-home --uid 10001 isl && mkdir -p /srv/isl && chown isl /srv/isl
USER isl
ENV ISL_STORAGE_ROOT=/srv/isl ISL_MODELS_DIR=/app/models
EXPOSE 8000
CMD ["isl", "serve", "--host", "0.0.0.0", "--port", "8000"]
