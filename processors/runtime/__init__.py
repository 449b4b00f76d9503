"""The processors' only seam to faust-streaming and aiokafka.

Nothing else in the product imports faust or aiokafka: the stages and handlers
(`processors.stages`, `processors.handlers`) see events, tables and outputs only. Here:

- `compat`: the faust/aiokafka internals this package relies on, verified at start-up;
- `app`: the faust app with the runtime's consumer, its topics, agents, timer and pages;
- `consumer`: faust's consumer, fixed to never skip a record nor commit past one;
- `tables`: faust tables whose changelog leaves with a batch's outputs;
- `publish`: one producer for a batch's changelog and outputs, internal envelopes;
- `inflight`: batches in flight, so that a rebalance lets them finish;
- `checkpoint`: what must be true before a batch's input offsets may be committed;
- `context`: the current event of an agent's task (where table writes go);
- `batches`: the batch loop every agent runs;
- `worker`: running the faust worker, and exiting it for a restart.
"""
