"""The scheduling simulator behind `edgecollab simulate`: engine, lower bound, reports."""
