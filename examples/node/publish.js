#!/usr/bin/env node
// Publish one app event to appevents over AMQP and wait for the broker's confirm.
//
// Usage:
//   node publish.js --name "Contact Created" --user user-123 \
//     --payload '{"email": "ada@example.com", "first_name": "Ada", "last_name": "Lovelace"}' [--id evt_123]
//
// Environment:
//   AMQP_URL            broker URL (default amqp://guest:guest@127.0.0.1:5672/%2f)
//   APPEVENTS_EXCHANGE  exchange to publish to (default app_events)
//
// Prints the event id on success; exits non-zero with a message on stderr otherwise.
'use strict';

const { randomUUID } = require('node:crypto');
const amqp = require('amqplib');

const USAGE = 'usage: node publish.js --name NAME --user USER_ID --payload JSON [--id ID]';
const CONFIRM_TIMEOUT_MS = 30_000;

function fail(message) {
  throw new Error(message);
}

function parseArgs(argv) {
  const args = {};
  for (let i = 0; i < argv.length; i += 2) {
    const flag = argv[i];
    if (!['--name', '--user', '--payload', '--id'].includes(flag) || i + 1 >= argv.length) {
      fail(`unexpected argument ${JSON.stringify(flag)}\n${USAGE}`);
    }
    args[flag.slice(2)] = argv[i + 1];
  }
  for (const required of ['name', 'user', 'payload']) {
    if (!args[required]) fail(`--${required} is required\n${USAGE}`);
  }
  return args;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  let payload;
  try {
    payload = JSON.parse(args.payload);
  } catch (err) {
    fail(`--payload is not JSON: ${err.message}`);
  }
  if (payload === null || typeof payload !== 'object' || Array.isArray(payload)) {
    fail('--payload must be a JSON object');
  }

  // The id is the idempotency key: publishing the same id again never runs a workflow twice,
  // so a publish that was not confirmed can simply be retried with the same --id.
  const id = args.id || randomUUID();
  const body = Buffer.from(
    JSON.stringify({
      id,
      name: args.name,
      user_id: args.user,
      payload,
      occurred_at: new Date().toISOString().replace(/\.\d{3}Z$/, 'Z'),
    }),
  );
  const exchange = process.env.APPEVENTS_EXCHANGE || 'app_events';

  // Without a confirm the outcome is unknown: give up rather than hang.
  setTimeout(() => {
    console.error(`publish failed: no confirm for event ${id} within 30 s; retrying with --id ${id} is safe`);
    process.exit(1);
  }, CONFIRM_TIMEOUT_MS).unref();

  let connection;
  try {
    connection = await amqp.connect(process.env.AMQP_URL || 'amqp://guest:guest@127.0.0.1:5672/%2f');
  } catch (err) {
    fail(`cannot connect to the broker: ${err.message}`);
  }
  // Failures also reject the pending operation, which reports them; these only keep an
  // unhandled 'error' event from crashing the process first.
  connection.on('error', () => {});
  try {
    // A confirm channel: the broker acks each message once it has stored it, or nacks it.
    const channel = await connection.createConfirmChannel();
    channel.on('error', () => {});
    // mandatory: a message no queue would take comes back as 'return', just before its ack,
    // instead of being dropped silently.
    let returned = null;
    channel.on('return', (message) => {
      returned = message.fields;
    });
    // Idempotent: the same declaration the worker makes.
    await channel.assertExchange(exchange, 'topic', { durable: true });
    channel.publish(exchange, args.name, body, {
      mandatory: true,
      persistent: true, // delivery_mode 2: the broker writes the message to disk
      contentType: 'application/json',
      messageId: id,
    });
    try {
      await channel.waitForConfirms(); // rejects if the broker nacked the message
    } catch (err) {
      fail(`the broker refused event ${id} (${err.message}); retrying with --id ${id} is safe`);
    }
    if (returned) {
      fail(
        `event ${id} was returned (${returned.replyCode} ${returned.replyText}): no queue is bound ` +
          `to exchange ${JSON.stringify(exchange)} for routing key ${JSON.stringify(args.name)} ` +
          '(has the appevents worker declared its queue?)',
      );
    }
    console.log(id);
  } finally {
    await connection.close().catch(() => {});
  }
}

main().catch((err) => {
  console.error(`publish failed: ${err.message}`);
  process.exitCode = 1;
});
