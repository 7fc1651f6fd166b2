/**
 * XML from outside the agent (the domain XML in a save-image header, what libvirt hands back) read with a real parser,
 * @xmldom/xmldom, never with regular expressions. Documents with a DOCTYPE (and so entity declarations), processing
 * instructions, or any error or warning of the parser are refused, as are trees deeper or larger than a domain is.
 */
import type { Document, Element, Node } from '@xmldom/xmldom';
import type { CloudletError } from '../errors';

/** Loaded on first use: an agent that restores no VM never needs it, and it costs ~3 MB of private memory. */
const xmldom = () => require('@xmldom/xmldom') as typeof import('@xmldom/xmldom');

/** Far beyond a domain (libvirt nests about 6 deep and writes a few hundred elements). */
const MAX_DEPTH = 32;
const MAX_ELEMENTS = 20_000;

const ELEMENT_NODE = 1;
const TEXT_NODE = 3;
const CDATA_SECTION_NODE = 4;
const PROCESSING_INSTRUCTION_NODE = 7;
const COMMENT_NODE = 8;

/** What a caller turns a refusal into: the error code depends on whose XML it was (an image's, an overlay's). */
export type XmlRefusal = (message: string) => CloudletError;

export function parseXml(xml: string, refuse: XmlRefusal): Document {
  // The parser would keep a DTD's entity declarations unexpanded; nothing we read may have one at all.
  if (/<!DOCTYPE|<!ENTITY/i.test(xml)) throw refuse('has a DOCTYPE or entity declarations, which are not accepted');
  let doc: Document;
  let refusal: CloudletError | null = null;
  try {
    doc = new (xmldom().DOMParser)({
      locator: false,
      onError: (level, message) => {
        throw (refusal = refuse(`is not well-formed XML (${level}: ${message})`));
      },
    }).parseFromString(xml, 'text/xml');
  } catch (err) {
    throw refusal ?? refuse(`is not well-formed XML (${(err as Error).message})`);
  }
  if (!doc.documentElement || doc.doctype) throw refuse('is not an XML document with one root element');
  let elements = 0;
  const walk = (node: Node, depth: number) => {
    if (depth > MAX_DEPTH) throw refuse(`is nested deeper than ${MAX_DEPTH}`);
    for (let child = node.firstChild; child; child = child.nextSibling) {
      if (child.nodeType === PROCESSING_INSTRUCTION_NODE) throw refuse('has a processing instruction, which is not accepted');
      if (child.nodeType === ELEMENT_NODE) {
        if (++elements > MAX_ELEMENTS) throw refuse(`has more than ${MAX_ELEMENTS} elements`);
        walk(child, depth + 1);
      }
    }
  };
  walk(doc.documentElement, 1);
  return doc;
}

export function serializeXml(doc: Document): string {
  return new (xmldom().XMLSerializer)().serializeToString(doc);
}

/** The element children of `parent`, all or only those named `name` (a qualified name such as `qemu:arg`). */
export function childElements(parent: Element, name?: string): Element[] {
  const out: Element[] = [];
  for (let child = parent.firstChild; child; child = child.nextSibling) {
    if (child.nodeType === ELEMENT_NODE && (name === undefined || (child as Element).nodeName === name)) out.push(child as Element);
  }
  return out;
}

/** The one child named `name`: none or several is refused. */
export function onlyChild(parent: Element, name: string, refuse: XmlRefusal): Element {
  const found = childElements(parent, name);
  if (found.length !== 1) throw refuse(`<${parent.nodeName}> has ${found.length} <${name}> elements, not one`);
  return found[0]!;
}

/** At most one child named `name`. */
export function optionalChild(parent: Element, name: string, refuse: XmlRefusal): Element | null {
  const found = childElements(parent, name);
  if (found.length > 1) throw refuse(`<${parent.nodeName}> has ${found.length} <${name}> elements`);
  return found[0] ?? null;
}

export function setText(element: Element, text: string): void {
  while (element.firstChild) element.removeChild(element.firstChild);
  element.appendChild(element.ownerDocument!.createTextNode(text));
}

/** The element's text, the concatenation of its text children. */
export function textOf(element: Element): string {
  let text = '';
  for (let child = element.firstChild; child; child = child.nextSibling) {
    if (child.nodeType === TEXT_NODE || child.nodeType === CDATA_SECTION_NODE) text += child.nodeValue ?? '';
  }
  return text;
}

/**
 * A string that is equal for two elements exactly when they mean the same: namespace and name, attributes in any
 * order and quoting, element children in order, text without the indentation around it; comments do not count.
 */
export function canonicalXml(element: Element): string {
  const attributes: string[] = [];
  for (let i = 0; i < element.attributes.length; i++) {
    const a = element.attributes.item(i)!;
    if (a.name === 'xmlns' || a.name.startsWith('xmlns:')) continue; // declarations: the namespaceURI below says it
    attributes.push(`${a.namespaceURI ?? ''}|${a.localName}=${JSON.stringify(a.value)}`);
  }
  attributes.sort();
  const parts: string[] = [];
  for (let child = element.firstChild; child; child = child.nextSibling) {
    if (child.nodeType === ELEMENT_NODE) parts.push(canonicalXml(child as Element));
    else if ((child.nodeType === TEXT_NODE || child.nodeType === CDATA_SECTION_NODE) && (child.nodeValue ?? '').trim() !== '') {
      parts.push(JSON.stringify((child.nodeValue ?? '').trim()));
    } else if (child.nodeType !== COMMENT_NODE && child.nodeType !== TEXT_NODE && child.nodeType !== CDATA_SECTION_NODE) {
      parts.push(`?${child.nodeType}`);
    }
  }
  return `<{${element.namespaceURI ?? ''}}${element.localName} ${attributes.join(' ')}>${parts.join('')}</>`;
}
