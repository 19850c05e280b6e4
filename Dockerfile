# GPU image for the whole pipeline: training, export, ONNX Runtime on CUDA/TensorRT, TensorRT engines.
#
#   docker build -t fakd-deploy .
#   docker run --gpus all --ipc=host --rm -v "$PWD:/work" fakd-deploy run recipes/quickstart.yaml
#   docker run --gpus all --rm -v "$PWD:/work" --entrypoint bash fakd-deploy scripts/gpu_check.sh
#
# The NGC PyTorch image brings torch, torchvision and TensorRT 10 built for its CUDA 12
# (release 24.12: PyTorch 2.6, TensorRT 10.7, CUDA 12.6, Python 3.12). Its pip constraint
# file (PIP_CONSTRAINT) pins them, so installing the project keeps the image's torch and
# TensorRT, which satisfy `tensorrt>=10,<12`.
FROM nvcr.io/nvidia/pytorch:24.12-py3

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MPLBACKEND=Agg

WORKDIR /opt/fakd-deploy
COPY pyproject.toml README.md ./
COPY fakd_deploy ./fakd_deploy
COPY recipes ./recipes
COPY scripts ./scripts

# The `gpu` extra installs onnxruntime-gpu and no CPU onnxruntime: both provide the same
# `onnxruntime` module and would overwrite each other file by file. The image may still
# carry a CPU onnxruntime from its own requirements, so it is removed first. cuda-python
# follows the image's CUDA major (12). DL3013 (pin pip versions) does not apply to
# ".[train,gpu]": that is this source tree.
# hadolint ignore=DL3013
RUN pip uninstall -y onnxruntime onnxruntime-gpu \
    && pip install ".[train,gpu]" "onnxruntime-gpu==1.20.1" "cuda-python>=12.3,<13" \
    && python -c "import tensorrt, onnxruntime; from fakd_deploy.deploy.cuda import runtime; runtime(); print('TensorRT', tensorrt.__version__, onnxruntime.get_available_providers())"

WORKDIR /work
ENTRYPOINT ["fakd-deploy"]
CMD ["--help"]
