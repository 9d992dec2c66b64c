"""The HTML report: selection, summary table, plots, rendering."""
