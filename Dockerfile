# GPU image for the whole pipeline: training, export, ONNX Runtime on CUDA/TensorRT, TensorRT engines.
#
#   docker build -t fakd-deploy .
#   docker run --gpus all --ipc=host --rm -v "$PWD:/work" fakd-deploy run recipes/quickstart.yaml
#   docker run --gpus all --rm -v "$PWD:/work" --entrypoint bash fakd-deploy scripts/gpu_check.sh
#
# The NGC PyTorch image brings torch, torchvision and TensorRT built for its CUDA (release
# 24.12: PyTorch 2.6, TensorRT 10.7, CUDA 12.6, Python 3.12). It sets no pip constraints of
# its own, so the versions it ships are written to one before anything is installed: pip then
# cannot replace them. The `gpu` extra is not used here: its tensorrt-cu12 wheel would put a
# second TensorRT beside the image's. onnxruntime-gpu 1.20 is the release whose TensorRT
# provider was built against TensorRT 10.4 (ONNX Runtime's requirements table), older than
# the image's 10.7, and cuda-python follows the image's CUDA major (12).
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

# onnxruntime and onnxruntime-gpu install the same module and would overwrite each other
# file by file: any CPU build the image carries is removed first. DL3013 (pin pip versions)
# does not apply to ".[train]": that is this source tree.
# hadolint ignore=DL3013
RUN pip list --format=freeze | grep -iE '^(torch|torchvision|tensorrt)==' > /etc/pip-image.txt \
    && pip uninstall -y onnxruntime onnxruntime-gpu \
    && PIP_CONSTRAINT=/etc/pip-image.txt pip install ".[train]" "onnxruntime-gpu>=1.20,<1.21" "cuda-python>=12.3,<13" \
    && python -c "import tensorrt, torch, onnxruntime; from fakd_deploy.deploy.cuda import runtime; runtime(); \
assert tensorrt.__version__.startswith('10.'), 'TensorRT ' + tensorrt.__version__; \
assert torch.__version__.startswith('2.'), 'torch ' + torch.__version__; \
assert onnxruntime.__version__.startswith('1.20.'), 'onnxruntime ' + onnxruntime.__version__; \
assert 'TensorrtExecutionProvider' in onnxruntime.get_available_providers(); \
print('TensorRT', tensorrt.__version__, 'torch', torch.__version__, 'onnxruntime', onnxruntime.__version__)"

WORKDIR /work
ENTRYPOINT ["fakd-deploy"]
CMD ["--help"]
