"""The sweep without Ray: its config, the trial config its Tune trials run, MLflow tracking and promotion (by Pearson
or label-free) with the registry's aliases, and its report. `lmadda_tune` runs it on Ray."""
