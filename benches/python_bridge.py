"""A reference Kafka-to-Pub/Sub bridge in Python, written the way an
astronomer would: confluent-kafka's consumer, google-cloud-pubsub's publisher
with the same batching as ztfhook (1000 messages, 4 MB, 10 ms), the same
attributes as ztfhook's pass-through, and a commit after every publish
future of a batch has resolved (at least once).

    python_bridge.py BOOTSTRAP TOPIC GROUP PROJECT PUBSUB_TOPIC N

Exits after N messages, printing the seconds from the first message to the
last commit. Uses PUBSUB_EMULATOR_HOST when set.
"""

import sys
import time

from confluent_kafka import Consumer
from google.cloud import pubsub_v1


def main():
    bootstrap, topic, group, project, pubsub_topic, n = sys.argv[1:7]
    n = int(n)
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topic])
    publisher = pubsub_v1.PublisherClient(
        batch_settings=pubsub_v1.types.BatchSettings(
            max_messages=1000, max_bytes=4_000_000, max_latency=0.01
        )
    )
    path = publisher.topic_path(project, pubsub_topic)
    done = 0
    first = None
    while done < n:
        messages = consumer.consume(num_messages=500, timeout=1.0)
        if messages and first is None:
            first = time.monotonic()
        futures = []
        for m in messages:
            if m.error():
                print(m.error(), file=sys.stderr)
                continue
            attributes = {
                "kafka.topic": m.topic(),
                "kafka.partition": str(m.partition()),
                "kafka.offset": str(m.offset()),
                "kafka.timestamp": str(m.timestamp()[1]),
            }
            futures.append(publisher.publish(path, m.value(), **attributes))
        for f in futures:
            f.result()
        if futures:
            consumer.commit(asynchronous=False)
        done += len(futures)
    print(f"{time.monotonic() - first:.3f}")
    consumer.close()


if __name__ == "__main__":
    main()
