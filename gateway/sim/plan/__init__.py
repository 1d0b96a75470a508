"""Planning: the cheapest deployment that meets a workload's SLOs (``pdgate plan``).

* :mod:`.request` — what a plan is asked for;
* :mod:`.prices` — sourced rental prices per device, with ``--price`` overrides;
* :mod:`.sizing` — per-instance capacity from the engines' physics, and DistServe's
  prefill/decode rate matching;
* :mod:`.space` — the candidate deployments (mode, device and layout per pool, counts);
* :mod:`.screen` — every candidate sized and scored analytically; the shortlist;
* :mod:`.evaluate` — one candidate simulated in virtual time, judged against the SLOs;
* :mod:`.parallel` — simulations over a process pool or a Ray cluster;
* :mod:`.search` — screen, then simulation and bisection of the shortlist (Vidur-Search);
  replay and robustness;
* :mod:`.output` — table, JSON, CSV, the Pareto plot and the gateway config of a plan;
* :mod:`.command` — the ``pdgate plan`` command line.
"""
