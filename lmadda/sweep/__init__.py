"""The sweep without Ray: its config (`config`), the trial config its Tune trials run (`trial_config`), its MLflow runs
(`tracking`), promotion into the registry by Pearson or label-free (`promotion`, `label_free_promotion`) and its report
(`report`). `lmadda_tune` runs it on Ray."""
