"""Train the malaria classifier with Ray Train: the `ray job submit` entrypoint.

On a cluster (from a checkout, with the head's dashboard address and token in the environment):

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/train.py --data s3://BUCKET/cell_images --output s3://BUCKET/runs/resnet-001 \
        --num-workers 4 --use-gpu

Locally, `python jobs/train.py --data DIR --output DIR` starts a single-node Ray and stops it at the
end (malaria_ray.runtime joins the cluster when RAY_ADDRESS is set, as under `ray job submit`). Prints
per-epoch loss/accuracy from rank 0, then a summary: run directory, model_id, validation
accuracy/sensitivity/specificity/AUC. Exit 0 on success, 2 with a one-line reason on bad input.
Takes exactly the flags of `malaria-ray train` (see --help).
"""

import sys

from malaria_ray import cli

if __name__ == "__main__":
    sys.exit(cli.main(["train", *sys.argv[1:]]))
