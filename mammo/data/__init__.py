"""Workspace tables and their splits, without torch: ``tables`` (CSV / XLSX reading, the one cell normaliser),
``splits`` (patient ids, the tissue and lesion tables, patient-level splits and folds), ``synthetic`` (the procedural
smoke-test data set)."""
