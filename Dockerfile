# The custom SDK container for Dataflow (GPU workers) and for Flink DOCKER environments:
# Beam's Python SDK image (its /opt/apache/beam/boot entrypoint runs the SDK harness), a CUDA build of
# PyTorch, and this package with its model weights. Build and push (docs/RUNNERS.md):
#   docker build -t REGION-docker.pkg.dev/PROJECT/cascade/cascade:0.1.0 .
#   docker push REGION-docker.pkg.dev/PROJECT/cascade/cascade:0.1.0
# The Beam and Python versions must equal those of the machine that submits the job.
ARG PYTHON_VERSION=3.11
ARG BEAM_VERSION=2.77.0
FROM apache/beam_python${PYTHON_VERSION}_sdk:${BEAM_VERSION}
ARG BEAM_VERSION

WORKDIR /opt/cascade
COPY pyproject.toml README.md ./
COPY configs configs
COPY models models
COPY pipelines pipelines
COPY transforms transforms

# torch wheels for Linux x86_64 on PyPI are CUDA builds (CUDA runtime as nvidia-* wheels); the driver
# comes from Dataflow's install-nvidia-driver. Keep Beam at the image's version.
RUN pip install --no-cache-dir "apache-beam[gcp]==${BEAM_VERSION}" . \
    && python -c "import torch, configs.schema, pipelines.cascade, transforms.stage; \
print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
    && python -c "import torch; assert torch.version.cuda, 'torch is not a CUDA build'"

ENTRYPOINT ["/opt/apache/beam/boot"]
