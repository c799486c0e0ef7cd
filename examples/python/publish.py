#!/usr/bin/env python3
"""Publish one app event to appevents over AMQP and wait for the broker's confirm.

Usage:
    python publish.py --name "Contact Created" --user user-123 \
        --payload '{"email": "ada@example.com", "first_name": "Ada", "last_name": "Lovelace"}' [--id evt_123]

Environment:
    AMQP_URL            broker URL (default amqp://guest:guest@127.0.0.1:5672/%2f)
    APPEVENTS_EXCHANGE  exchange to publish to (default app_events)

Prints the event id on success; exits non-zero with a message on stderr otherwise.
"""

import argparse
import json
import os
import sys
import uuid
from datetime import datetime, timezone

import pika
from pika.exceptions import AMQPError, NackError, UnroutableError

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2f"


def fail(message):
    print(f"publish failed: {message}", file=sys.stderr)
    sys.exit(1)


def main():
    parser = argparse.ArgumentParser(description="Publish one app event to appevents.")
    parser.add_argument("--name", required=True, help="event name, also the routing key")
    parser.add_argument("--user", required=True, help="id of the user in your app")
    parser.add_argument("--payload", required=True, help="event payload, a JSON object")
    parser.add_argument("--id", help="event id (default: a new UUID)")
    args = parser.parse_args()

    try:
        payload = json.loads(args.payload)
    except json.JSONDecodeError as e:
        fail(f"--payload is not JSON: {e}")
    if not isinstance(payload, dict):
        fail("--payload must be a JSON object")

    # The id is the idempotency key: publishing the same id again never runs a workflow twice,
    # so a publish that was not confirmed can simply be retried with the same --id.
    event_id = args.id or str(uuid.uuid4())
    body = json.dumps(
        {
            "id": event_id,
            "name": args.name,
            "user_id": args.user,
            "payload": payload,
            "occurred_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
    ).encode("utf-8")
    properties = pika.BasicProperties(
        content_type="application/json",
        delivery_mode=2,  # persistent: the broker writes the message to disk
        message_id=event_id,
    )

    exchange = os.environ.get("APPEVENTS_EXCHANGE", "app_events")
    params = pika.URLParameters(os.environ.get("AMQP_URL", DEFAULT_URL))
    # A broker short of memory or disk blocks publishers; give up instead of hanging.
    params.blocked_connection_timeout = 30
    try:
        connection = pika.BlockingConnection(params)
    except AMQPError as e:
        fail(f"cannot connect to the broker at {params.host}:{params.port}: {e!r}")

    try:
        channel = connection.channel()
        # Idempotent: the same declaration the worker makes.
        channel.exchange_declare(exchange, exchange_type="topic", durable=True)
        # Publisher confirms: basic_publish now blocks until the broker has stored the message
        # (ack) or refused it (NackError). Without confirms a message can be lost silently.
        channel.confirm_delivery()
        # mandatory: a message no queue would take comes back (UnroutableError) instead of
        # being dropped.
        channel.basic_publish(exchange, args.name, body, properties, mandatory=True)
    except UnroutableError:
        fail(
            f"event {event_id} was returned: no queue is bound to exchange {exchange!r} "
            f"for routing key {args.name!r} (has the appevents worker declared its queue?)"
        )
    except NackError:
        fail(f"the broker refused event {event_id} (nack); retrying with --id {event_id} is safe")
    except AMQPError as e:
        fail(f"event {event_id} was not confirmed: {e!r}; retrying with --id {event_id} is safe")
    finally:
        if connection.is_open:
            connection.close()

    print(event_id)


if __name__ == "__main__":
    main()
