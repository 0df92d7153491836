"""streamd: Kafka-native stream processing for industrial anomaly detection.

Kafka in, a DAG of model Nodes on Celery workers, results and anomaly events
out to Kafka. See README.md and docs/.
"""

from .exceptions import StreamdError
from .nodes.base import Node, NodeEnv, RunContext, register

__version__ = "0.1.0"

__all__ = ["StreamdError", "Node", "NodeEnv", "RunContext", "register", "__version__"]
