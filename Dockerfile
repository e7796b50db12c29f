# The pdserve image for Kubernetes (helm/pdserve) and Ray clusters that run containers:
# Ray 2.60 with CUDA, Debian's libibverbs1 (the Mooncake wheel links against it), pdserve with
# the CUDA Mooncake wheel.
#   docker build -t REGISTRY/pdserve:0.1.0 . && docker push REGISTRY/pdserve:0.1.0
FROM rayproject/ray:2.60.0-py311-cu128

USER root
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libibverbs1 \
 && rm -rf /var/lib/apt/lists/*
USER ray

COPY --chown=ray:users . /home/ray/pdserve
RUN pip install --no-cache-dir "/home/ray/pdserve[mooncake-cuda]"
WORKDIR /home/ray
