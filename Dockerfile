# The election-agent image: the release binary and the few glibc libraries it links, nothing else
# (no shell, no package manager), run as the non-root user 65532. No base image can be pulled where
# this is built, hence `FROM scratch` over a root filesystem staged on the host.
#
# Build it with scripts/image.sh, which builds the release binary, stages target/image/rootfs/
# (binary stripped, the libraries `ldd` names, /etc/passwd, /etc/group, /etc/nsswitch.conf) and
# runs
#   podman build -f Dockerfile --build-arg VERSION=… --build-arg REVISION=… -t … target/image
# The build context is target/image — the staged tree only, a few tens of MB — never the
# repository root, whose target/ holds gigabytes of build output; so a plain `podman build .` here
# does not work: run the script.
FROM scratch

ARG VERSION=unknown
ARG REVISION=unknown

LABEL org.opencontainers.image.title="election-agent" \
      org.opencontainers.image.description="Leader-election service and Kubernetes operator: campaign, keep, hand over and watch leadership over gRPC or HTTP" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY rootfs/ /

# The chart's ports (values.yaml grpc.port, http.port). The agent's own defaults, 443 and 80, are
# privileged ports the non-root user cannot bind with its capabilities dropped, so the image
# defaults to the chart's; the chart sets both explicitly anyway.
ENV EA_GRPC_PORT=9090 \
    EA_HTTP_PORT=8080
EXPOSE 9090 8080

# glibc's per-thread caches (tcache) keep freed chunks spread over the heap, and each pins its
# page: after a flood of connections the agent's RSS stayed ~4 MB (over 20 %) above its start;
# without them, within 1 MB (scripts/flood.sh). No throughput difference beyond noise.
ENV GLIBC_TUNABLES=glibc.malloc.tcache_count=0

# Numeric, so that Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER 65532:65532

ENTRYPOINT ["/usr/local/bin/election-agent"]
