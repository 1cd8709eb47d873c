"""Regenerate crd-schemas.json from KubeRay's CRDs (not run by the tests).

    git clone --branch v1.7.0 https://github.com/ray-project/kuberay
    python tests/data/kuberay-v1.7.0/vendor.py kuberay/ray-operator/config/crd/bases

Keeps the served `v1` openAPIV3Schema of RayCluster, RayJob and RayCronJob exactly as generated,
minus every `description` (documentation only: 2.8 MB of the 3.1 MB). The three CRDs embed each
other (RayCronJob.spec.jobTemplate is RayJobSpec, RayJob.spec.rayClusterSpec is RayClusterSpec):
this script checks that they are equal and stores each once under `$defs`, so the file is one
fifth of the three schemas side by side.
"""

import json
import pathlib
import sys

import yaml


def _strip(node):
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def main(bases: str) -> None:
    schemas = {}
    for kind, plural in (("RayCluster", "rayclusters"), ("RayJob", "rayjobs"), ("RayCronJob", "raycronjobs")):
        crd = yaml.safe_load((pathlib.Path(bases) / f"ray.io_{plural}.yaml").read_text())
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        assert v1["served"] and v1["storage"], plural
        schemas[kind] = _strip(v1["schema"]["openAPIV3Schema"])
    cluster_spec = schemas["RayCluster"]["properties"]["spec"]
    job_spec = schemas["RayJob"]["properties"]["spec"]
    assert job_spec["properties"]["rayClusterSpec"] == cluster_spec
    assert schemas["RayCronJob"]["properties"]["spec"]["properties"]["jobTemplate"] == job_spec
    job_spec["properties"]["rayClusterSpec"] = {"$ref": "#/$defs/RayClusterSpec"}
    schemas["RayCluster"]["properties"]["spec"] = {"$ref": "#/$defs/RayClusterSpec"}
    schemas["RayJob"]["properties"]["spec"] = {"$ref": "#/$defs/RayJobSpec"}
    schemas["RayCronJob"]["properties"]["spec"]["properties"]["jobTemplate"] = {"$ref": "#/$defs/RayJobSpec"}
    out = {"source": "ray-project/kuberay v1.7.0 (59d663aeec13760646da3db9c1cf8cfe883e30b7), "
                     "ray-operator/config/crd/bases/ray.io_{rayclusters,rayjobs,raycronjobs}.yaml, version v1",
           "$defs": {"RayClusterSpec": cluster_spec, "RayJobSpec": job_spec},
           "kinds": schemas}
    path = pathlib.Path(__file__).with_name("crd-schemas.json")
    path.write_text(json.dumps(out, indent=None, separators=(",", ":"), sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
