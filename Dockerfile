# easel: the Discord bot and the image server (`easel run`), on the CPU build of torch.
#   docker build -t easel .
#   docker run --env-file easel.env -p 8080:8080 -v easel-data:/data easel
# Settings: /data/easel.toml if mounted there (else the built-in defaults and the EASEL_* below);
# secrets (DISCORD_TOKEN, OPENAI_API_KEY, ...) come from the environment only.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# torch first and pinned, from the CPU index: an open-ended torch requirement pulls a
# multi-GB CUDA build. For a GPU image use a CUDA base and the matching torch index instead.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

COPY pyproject.toml README.md ./
COPY bot ./bot
COPY generators ./generators
COPY moderation ./moderation
COPY storage ./storage
RUN pip install ".[local,nsfw,cloud,discord]"

RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin easel \
    && mkdir -p /data \
    && chown easel:easel /data

# Everything easel keeps (database, images, the tiny model, the model cache) is under /data.
ENV EASEL_STORAGE__DATABASE=/data/easel.db \
    EASEL_STORAGE__IMAGES_DIR=/data/images \
    EASEL_SERVER__HOST=0.0.0.0 \
    EASEL_SERVER__PORT=8080 \
    HF_HOME=/data/huggingface

USER easel
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8080

# No curl in the slim image: Python asks the image server's /healthz (a non-2xx raises: unhealthy).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('EASEL_SERVER__PORT', '8080') + '/healthz', timeout=3)"]

CMD ["easel", "run"]
