# syntax=docker/dockerfile:1
# The tdm image of the chart (charts/tdm) and of k8s/: Ray head, worker and job-submitter pods, and by
# default the MLflow server. Ray 2.60 on Python 3.11, tdm's pinned dependencies, tdm/ and pipelines/
# under /app (values.yaml image.appDir).
#
#   docker build -t REGISTRY/tdm:0.1.0 .                                     # image.repository (CPU)
#   docker build --build-arg RAY_VARIANT=-cu128 -t REGISTRY/tdm-cuda:0.1.0 .  # gpuImage.repository
#
# RAY_VARIANT is the platform suffix of the rayproject/ray tag: "" (CPU), -gpu or -cuXXX.
# RAY_VERSION must equal the chart's ray.version (the RayCluster's rayVersion).
ARG RAY_VERSION=2.60.0
ARG RAY_VARIANT=""
FROM rayproject/ray:${RAY_VERSION}-py311${RAY_VARIANT}
ARG RAY_VARIANT

# rayproject/ray runs as `ray`, uid 1000, gid 100 ("users"), and its Python (/home/ray/anaconda3)
# belongs to that user, so pip needs no root (ray-project/ray docker/base-deps/Dockerfile: RAY_UID=1000,
# RAY_GID=100, `USER $RAY_UID`). uid 1000 is the chart's securityContext.runAsUser; USER is numeric so
# the kubelet can check runAsNonRoot. WORKDIR would create /app owned by root, hence the mkdir.
USER root
RUN mkdir -p /app && chown 1000:100 /app
USER 1000
WORKDIR /app

# Dependencies first, from pyproject.toml's list under constraints.txt's pins: this layer is rebuilt
# only when those two files change, not on every code change. constraints.txt pins torch==2.13.0,
# which the PyTorch CPU index serves as 2.13.0+cpu (PyPI's Linux wheel of the same version is the CUDA
# build, right for the GPU variants). psycopg2-binary (MLflow's Postgres driver for the server in
# mlflow.yaml) is not a tdm dependency, so it is named here; constraints.txt pins it, the version that
# tests/test_mlflow_server.py runs that server with.
COPY --chown=1000:100 pyproject.toml constraints.txt ./
RUN python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
 && case "$RAY_VARIANT" in \
        ""|-cpu) torch_index="--extra-index-url https://download.pytorch.org/whl/cpu" ;; \
        *) torch_index="" ;; \
    esac \
 && pip install --no-cache-dir $torch_index -c constraints.txt -r /tmp/requirements.txt psycopg2-binary \
 && rm /tmp/requirements.txt

# The code. Editable, so `import tdm` resolves to /app/tdm: the same files the RayJob ships as its
# working_dir and the RayService puts on PYTHONPATH, not a second copy in site-packages.
COPY --chown=1000:100 README.md ./
COPY --chown=1000:100 tdm/ tdm/
COPY --chown=1000:100 pipelines/ pipelines/
RUN pip install --no-cache-dir --no-deps -c constraints.txt -e .
