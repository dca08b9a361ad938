"""The lesion classes, in the channel order of every mask, label, logit and metric."""

CLASSES = ('EX', 'HE', 'SE', 'MA')  # hard exudates, haemorrhages, soft exudates, microaneurysms
