"""Development tools of finetune-operator (never shipped in an image): the embedded cluster, image builds,
the demo and the generators of the chart's CRD copy and the README tables."""
