# GPU image for the whole pipeline: training, export, ONNX Runtime GPU and TensorRT 10.
#
#   docker build -t fakd-deploy .
#   docker run --gpus all --ipc=host --rm -v "$PWD:/work" fakd-deploy run recipes/quickstart.yaml
#
# The NGC PyTorch image brings torch, torchvision and TensorRT 10 built for its CUDA 12
# (release 24.12: PyTorch 2.6, TensorRT 10.7, CUDA 12.6, Python 3.12). Its pip constraint
# file (PIP_CONSTRAINT) pins them, so installing the project keeps the image's torch.
FROM nvcr.io/nvidia/pytorch:24.12-py3

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MPLBACKEND=Agg

WORKDIR /opt/fakd-deploy
COPY pyproject.toml README.md ./
COPY fakd_deploy ./fakd_deploy
COPY recipes ./recipes

# onnxruntime (a core dependency) and onnxruntime-gpu install the same Python module and
# the one installed last wins file by file: remove both, then install the GPU build alone.
# DL3013 (pin pip versions) does not apply to ".[gpu]": that is this source tree.
# hadolint ignore=DL3013
RUN pip install ".[gpu]" \
    && pip uninstall -y onnxruntime onnxruntime-gpu \
    && pip install "onnxruntime-gpu==1.20.1" \
    && python -c "import tensorrt, onnxruntime; print('TensorRT', tensorrt.__version__, onnxruntime.get_available_providers())"

WORKDIR /work
ENTRYPOINT ["fakd-deploy"]
CMD ["--help"]
