"""Pipeline-parallel schedules: DualPipe / DualPipeV executors, deferred weight gradients (dW
detach) and a schedule simulator that renders timelines and measures bubbles.

Modules: ``simulator`` (op lists for 1F1B, ZB1P, DualPipe, DualPipeV; dependency simulation;
text timelines; ``python -m mindspeed_parallel.pipeline.simulator``), ``dualpipev`` and
``dualpipe`` (executors over a caller-given process group), ``p2p`` (tagged point-to-point
helpers), ``weight_grad`` (``WeightGradStore`` and ``WeightGradLinear``).
"""
