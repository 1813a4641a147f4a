"""Ingest: Wikipedia parquet, MediaWiki XML dumps and JSONL -> cleaned article parts with source ids.

Public API: `IngestConfig`, `run_ingest`, `iter_articles`, `iter_row_group`, `verify_ingest` (see run.py),
`ARTICLES_SCHEMA` (clean.py).
"""
from nulls_dist.data_pipeline.ingest.clean import ARTICLES_SCHEMA
from nulls_dist.data_pipeline.ingest.run import (
                                      ARTICLES_DIR,
                                      REPORT_NAME,
                                      IngestConfig,
                                      article_parts,
                                      iter_articles,
                                      iter_row_group,
                                      read_report,
                                      run_ingest,
                                      verify_ingest,
)

__all__ = ["ARTICLES_DIR", "ARTICLES_SCHEMA", "REPORT_NAME", "IngestConfig", "article_parts", "iter_articles",
           "iter_row_group", "read_report", "run_ingest", "verify_ingest"]
