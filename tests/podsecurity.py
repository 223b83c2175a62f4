"""Pod Security `restricted`, field by field, for a live pod: shared by the control-plane and kind suites.

Admission already refused any pod that violates `restricted` in an enforcing namespace; these checks say
which field carries each guarantee, container by container, the injected storage-initializer included.
"""

from __future__ import annotations


def assert_restricted_pod(pod: dict) -> None:
    name = pod["metadata"]["name"]
    pod_ctx = pod["spec"].get("securityContext") or {}
    for c in pod["spec"]["containers"] + pod["spec"].get("initContainers", []):
        ctx = c.get("securityContext") or {}
        where = f"{name}/{c['name']}"
        assert ctx.get("allowPrivilegeEscalation") is False, where
        assert ctx.get("capabilities", {}).get("drop") == ["ALL"], where
        assert ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True, where
        assert ctx.get("runAsUser", pod_ctx.get("runAsUser")) not in (0, None), where
        assert (ctx.get("seccompProfile") or pod_ctx.get("seccompProfile")) == {"type": "RuntimeDefault"}, (
            where
        )
        assert not ctx.get("privileged"), where
