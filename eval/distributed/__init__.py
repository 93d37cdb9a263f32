"""Batch work on Ray: `adselect eval run|tune --ray [ADDRESS]` and `adselect ingest --ray [ADDRESS]`.

- cluster.py: connect to (or start) Ray for one command and always disconnect after it;
- reading.py: the logged impressions as a Ray Dataset (JSONL or Parquet, one file or a folder of parts);
- eval_actors.py / backend.py: the eval fast phase on an actor pool (one Selector per actor) and the
  LLM phase on LLM actors spread over one or more OpenAI-compatible endpoints; eval.harness writes the
  same report.json from the records gathered back in input order;
- eval_actors.TuneActor / RayBackend.tune_featurizer: `eval tune`'s feature rows on the actor pool, the fit in the driver;
- embed.py: catalog embedding batches on actors (one model per actor) for ingest;
- behaviour.py: behaviour learning's counting on actors (histories partitioned by their de-duplication
  key, partial counts merged exactly in the driver, the tables computed there from the merged counts).

The sequence model's training does not run on Ray.
"""
from eval.distributed.backend import RayBackend
from eval.distributed.cluster import RayConnectError, ray_session

__all__ = ["RayBackend", "RayConnectError", "ray_session"]
