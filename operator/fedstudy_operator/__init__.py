"""The fedstudy Kubernetes operator: FederatedStudy resources become aggregators and trainers."""
