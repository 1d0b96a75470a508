"""Planning: the cheapest deployment that meets a workload's SLOs (``pdgate plan``).

* :mod:`.prices` — sourced rental prices per device, with ``--price`` overrides;
* :mod:`.sizing` — per-instance capacity from the engines' physics, and DistServe's
  prefill/decode rate matching;
* :mod:`.space` — the candidate deployments (mode, device and layout per pool, counts);
* :mod:`.evaluate` — one candidate simulated in virtual time, judged against the SLOs;
* :mod:`.search` — analytic screen, then simulation and bisection of the best candidates
  (Vidur-Search), over a process pool or a Ray cluster; replay and robustness;
* :mod:`.output` — table, JSON, CSV, the Pareto plot and the gateway config of a plan;
* :mod:`.command` — the `pdgate plan` command line.
"""
